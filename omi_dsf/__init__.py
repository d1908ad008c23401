"""OMI on DSF: Open Medical Inference over the MII Data Sharing Framework."""

__version__ = "0.1.0"
