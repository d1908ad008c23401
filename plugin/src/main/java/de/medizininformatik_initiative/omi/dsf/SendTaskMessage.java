package de.medizininformatik_initiative.omi.dsf;

import java.util.List;
import java.util.Objects;
import java.util.stream.Stream;

import org.camunda.bpm.engine.delegate.DelegateExecution;
import org.camunda.bpm.engine.impl.el.FixedValue;
import org.camunda.bpm.model.bpmn.instance.EndEvent;
import org.hl7.fhir.r4.model.Coding;
import org.hl7.fhir.r4.model.Endpoint;
import org.hl7.fhir.r4.model.Identifier;
import org.hl7.fhir.r4.model.Task.ParameterComponent;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.activity.AbstractTaskMessageSend;
import dev.dsf.bpe.v1.constants.NamingSystems.EndpointIdentifier;
import dev.dsf.bpe.v1.variables.Variables;

/**
 * Sends a DSF message (a Task) to another organization. The target is the organization named by a
 * process variable, or, without one, the requester of the start Task; its endpoint is the one it
 * has in the parent organization with the given role. The listed variables travel as Task inputs.
 */
public class SendTaskMessage extends AbstractTaskMessageSend
{
	private String targetOrganizationVariable;
	private String targetRole;
	private List<String> inputs = List.of();
	private String errorMessage;

	public SendTaskMessage(ProcessPluginApi api)
	{
		super(api);
	}

	public void setTargetOrganizationVariable(FixedValue value)
	{
		targetOrganizationVariable = value.getExpressionText();
	}

	public void setTargetRole(FixedValue value)
	{
		targetRole = value.getExpressionText();
	}

	public void setInputs(FixedValue value)
	{
		inputs = PluginIndex.list(value.getExpressionText());
	}

	/** A fixed error sent as input {@code error}, for the message that reports a step's timeout. */
	public void setErrorMessage(FixedValue value)
	{
		errorMessage = value.getExpressionText();
	}

	@Override
	protected void doExecute(DelegateExecution execution, Variables variables) throws Exception
	{
		try
		{
			variables.setTarget(findTarget(variables));
		}
		catch (RuntimeException e)
		{
			String message = "Cannot send " + getMessageName(execution, variables) + ": " + e.getMessage();
			if (execution.getBpmnModelElementInstance() instanceof EndEvent)
				handleEndEventError(execution, variables, e, message);
			else
				handleIntermediateThrowEventError(execution, variables, e, message);
			return;
		}
		super.doExecute(execution, variables);
	}

	private dev.dsf.bpe.v1.variables.Target findTarget(Variables variables)
	{
		Objects.requireNonNull(targetRole, "field targetRole");
		PluginIndex index = PluginIndex.get();
		String organization = targetOrganizationVariable != null ? variables.getString(targetOrganizationVariable)
				: variables.getStartTask().getRequester().getIdentifier().getValue();
		if (organization == null || organization.isBlank())
			throw new IllegalStateException("no target organization (variable " + targetOrganizationVariable + ")");

		Coding role = new Coding(PluginIndex.ORGANIZATION_ROLE_SYSTEM, targetRole, null);
		Endpoint endpoint = api.getEndpointProvider()
				.getEndpoint(index.getParentOrganization(), organization, role)
				.orElseThrow(() -> new IllegalStateException("organization " + organization + " has no active endpoint as "
						+ targetRole + " of " + index.getParentOrganization()));
		String endpointIdentifier = EndpointIdentifier.findFirst(endpoint).map(Identifier::getValue)
				.orElseThrow(() -> new IllegalStateException("endpoint of " + organization + " has no identifier"));
		return variables.createTarget(organization, endpointIdentifier, endpoint.getAddress());
	}

	@Override
	protected Stream<ParameterComponent> getAdditionalInputParameters(DelegateExecution execution, Variables variables)
	{
		String system = PluginIndex.get().getCodeSystem();
		Stream<ParameterComponent> values = inputs.stream().filter(code -> variables.getVariable(code) != null)
				.filter(code -> errorMessage == null || !"error".equals(code))
				.map(code -> new ParameterComponent(Values.code(system, code), Values.toFhir(variables.getVariable(code))));
		return errorMessage == null ? values
				: Stream.concat(values, Stream.of(new ParameterComponent(Values.code(system, "error"), Values.toFhir(errorMessage))));
	}
}
