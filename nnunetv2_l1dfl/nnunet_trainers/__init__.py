"""The folder the ``.pth`` hook lists in ``nnUNet_extTrainer``; nnU-Net imports its modules by bare name."""
