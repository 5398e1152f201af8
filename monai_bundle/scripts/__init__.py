"""Code the bundle's configs instantiate: network, metadata encoding, transforms, training."""
