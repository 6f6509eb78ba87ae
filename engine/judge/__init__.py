"""Does a picture follow its prompt: procedural drawings and the small classifier trained on them."""
