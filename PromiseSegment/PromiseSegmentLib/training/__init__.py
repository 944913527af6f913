"""Training an adapter: configuration, trainer and resume, losses, augmentation."""
