"""apsnake: DECam alert production (Rubin ap_pipe rebuilt as a Snakemake workflow)."""

__version__ = "0.1.0"
