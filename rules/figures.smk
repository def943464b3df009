# Stage file: figures (rules join as their issue lands).
