"""Dataset readers (Omniglot, mini-ImageNet) and the prepared-dataset format they share."""
