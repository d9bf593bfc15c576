"""Training data: finding images and captions under data_root and turning them into batches."""
