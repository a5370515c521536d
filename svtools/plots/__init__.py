"""Figures of the book, one module per part. Every function returns a matplotlib Figure with
labelled axes and units; the notebooks add the captions."""

import matplotlib.pyplot as plt


def subplots(*args, **kwargs):
    """``plt.subplots``, detached from pyplot's list of open figures.

    A function that returns its Figure should not also leave it open in pyplot: a notebook would
    show it twice (once as the cell's value, once when pyplot flushes), and loops would pile up
    open figures. Display the returned Figure (make it a cell's last expression).
    """
    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes
