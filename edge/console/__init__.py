"""The browser console's static assets (``/ui/``): plain HTML, CSS and ES modules, no build step.

The console is a client of the public API only; see docs/console.md.
"""
