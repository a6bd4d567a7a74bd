"""Multiple-instance learning for whole-slide images: the MIL model zoo and the CoMEL continual stage."""
