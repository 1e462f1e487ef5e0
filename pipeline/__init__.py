"""Feature-cache transfer learning: a frozen ResNet18 runs once, classical heads train in seconds."""
__version__ = "0.1.0"
