"""Rockpool's workspace image pipeline: build, store and run workspace VM images."""

__version__ = "0.1.0"
