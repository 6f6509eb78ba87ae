"""Frame transports (Spout, Syphon, NDI, shared memory, files, patterns)."""
