"""``fastis demo``: uniform vs importance sampling at equal wall-clock, on MNIST-1D.

``config`` says what defines a run (methods, tuned rates, ``RunConfig``), ``data`` makes
(and caches) the data set, ``models`` the network, ``train`` runs one method for a time
budget, ``baselines`` the peers' rules, ``report`` writes the table, ``results.json`` and
the plot.
"""
