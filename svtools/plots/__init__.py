"""Figures of the book, one module per part. Every function returns a matplotlib Figure with
labelled axes and units; the notebooks add the captions."""
