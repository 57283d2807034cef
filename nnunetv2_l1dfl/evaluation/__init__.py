"""Comparison of trainers on PET lesions (``l1dfl compare``; see docs/evaluation.md).

Modules: ``metrics`` (patient- and lesion-level metrics, plain functions on arrays),
``calibration``, ``stats`` (paired Wilcoxon, Bonferroni), ``io`` (finding and checking files),
``compare`` (orchestration), ``summary``, ``report`` (``headline_table``), ``plots``, ``cli``.
Nothing is imported here, so importing the package stays cheap.
"""
