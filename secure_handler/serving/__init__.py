"""What runs inside the TorchServe worker: the handlers, envelope reading, TorchScript loading."""
