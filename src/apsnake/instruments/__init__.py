"""Instrument modules: every camera fact lives behind one module per camera (DECam first)."""
