"""Model loading: hub ids, folders, single files, LoRA fusing, TAESD, the builtin tiny model."""
