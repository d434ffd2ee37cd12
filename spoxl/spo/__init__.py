"""SPO's online data path: the step-wise pool sampler and the transition pairs it collects."""
