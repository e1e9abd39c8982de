"""genderlens services: capture, inference, viewer, and the ``genderlens`` CLI that runs them."""
