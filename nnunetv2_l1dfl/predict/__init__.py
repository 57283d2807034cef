"""``l1dfl predict``: apply a trained nnU-Net model to PET/CT studies (DICOM or NIfTI) and write DICOM SEG,
RTSTRUCT, NIfTI label and instance maps, a lesion report (volume, SUVmax/mean/peak, TLG; TMTV, Dmax) and a
coronal MIP per study. Modules: ``inputs`` (study discovery and loading, reusing the converter), ``model``
(finding, checking and loading the model with nnU-Net's predictor), ``outputs`` (the writers), ``runner``
(the resumable, atomic batch), ``cli`` (the command line)."""
