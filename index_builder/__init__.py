"""The builder job: a catalogue of sold items in, a versioned Annoy index artifact in the model store out."""
