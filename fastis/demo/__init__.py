"""``fastis demo``: uniform vs importance sampling at equal wall-clock, on MNIST-1D.

``data`` makes (and caches) the data sets, ``models`` the networks, ``train`` runs one
method for a time budget, ``report`` writes the table, ``results.json`` and the plot.
"""
