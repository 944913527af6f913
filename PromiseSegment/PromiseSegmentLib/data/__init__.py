"""Data in and out: geometry and intensity (preprocessing), prompts, volume files and DICOM series,
datasets for training, the bundled demo slices."""
