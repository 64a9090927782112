"""The ``itop`` application: the command line (:mod:`itop.app.cli`), training runs
(:mod:`itop.app.train`), the paper models and data sets, FLOP counts and plots.

It needs the ``cli`` extra (tqdm, matplotlib, mnist1d, scikit-learn); the library (``itop``,
``itop_kernels``) never imports it. Nothing is imported here, so ``import itop.app.run_files``
stays light.
"""
