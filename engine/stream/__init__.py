"""StreamDiffusion math on torch tensors: schedule, stream batch, guidance, filter, attention."""
