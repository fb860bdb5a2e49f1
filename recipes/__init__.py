"""Example recipes that apply limeify to small offline models and data sets."""
