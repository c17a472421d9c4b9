"""The layers pretraining and fine-tuning share: audio, data, models, phases, training, system, config, reports."""

import logging as _logging

# the root logger's handlers when the package was first imported: the user's own (a notebook's logging.basicConfig),
# which common.system.logger.setup_logging keeps; a handler logging.basicConfig adds after it (a library warning at
# import with no handler yet) is the one it replaces
ROOT_HANDLERS_AT_IMPORT = tuple(_logging.getLogger().handlers)
