"""pricectl: learn one pricing agent for every product from raw sales history."""

__version__ = "0.1.0"
