"""Preprocessing: micrograph import and CTF estimation."""
