# Stage file: cpt (rules join as their issue lands).
