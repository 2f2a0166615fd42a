"""dtl: distributed transfer learning of image classifiers."""
__version__ = "0.1.0"
