from v2v_servicekit import run

from logistics_service.app import DEFINITION

run(DEFINITION)
