"""The embedded synthetic PSMA PET/CT cohort (``l1dfl phantom``), used by ``l1dfl demo`` and the tests.

- :mod:`.anatomy`: analytic body, organs, skeleton and vessels (LPS mm), rasterized onto any grid.
- :mod:`.cohort`: the seeded plan: patients, injections, lesions drawn to the L1DFL paper's statistics.
- :mod:`.render`: PET (SUVbw, blurred and noisy), CT (HU), lesion and organ masks of one study.
- :mod:`.dicom_writer`: PET/CT series, RTSTRUCT and DICOM SEG.
- :mod:`.generate`: the cohort on disk with its ground truth (:func:`.generate.generate_cohort`).

See ``docs/demo.md`` for what the phantom does and does not model.
"""
