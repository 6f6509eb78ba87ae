"""Model loading: hub ids, local folders, single files, LoRA fusing, TAESD and the builtin tiny model."""
