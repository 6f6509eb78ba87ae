"""ControlNet condition images: Canny edges, monocular depth, or the frame itself."""
