"""Musical time: a tempo clock (beats, bars, phase) and its sources (tap, MIDI clock, Ableton Link)."""
