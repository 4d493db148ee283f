from v2v_servicekit import run

from order_service.app import DEFINITION

run(DEFINITION)
