# Stage file: evaluation (rules join as their issue lands).
