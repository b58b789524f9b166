"""Generation backends: the engines that generate a batch and count its routing per group."""
