"""MIDI controllers: mapping files, control decoding, ports (issue 26)."""
