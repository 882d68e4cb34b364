"""Base models: building torchvision CNNs, loading local weights safely, pre-training the default."""
