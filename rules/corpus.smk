# Stage file: corpus (rules join as their issue lands).
