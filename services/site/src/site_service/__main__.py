from v2v_servicekit import run

from site_service.app import DEFINITION

run(DEFINITION)
