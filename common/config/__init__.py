"""Recipes as validated data, and the checks a recipe's files must pass before any compute."""
