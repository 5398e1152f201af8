"""The fusion model as a MONAI bundle (configs/, models/, docs/, scripts/)."""
