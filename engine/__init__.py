"""latentstage engine: real-time StreamDiffusion for live visuals."""

__version__ = "0.1.0"
