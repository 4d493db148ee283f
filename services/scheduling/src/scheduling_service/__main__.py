from v2v_servicekit import run

from scheduling_service.app import DEFINITION

run(DEFINITION)
