"""The engine process: threads, input slot, output queues, stats and lifecycle."""
