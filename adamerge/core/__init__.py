"""The differentiable merge: task vectors, coefficient groups, the functional merged model, masks,
checkpoint pools and test-time coefficient maths. No Lightning, no run folders."""
