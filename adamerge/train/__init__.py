"""Training on unlabeled streams: objectives, data streams and heads, the experts' cached targets,
scoring, run folders, and the Lightning loop that runs a method's solver stages."""
