"""MIDI controllers: mapping files that bind CCs, notes, pitch bend and program changes to live parameters."""
